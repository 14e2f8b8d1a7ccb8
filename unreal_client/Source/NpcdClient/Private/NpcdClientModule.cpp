#include "HAL/PlatformProcess.h"
#include "Interfaces/IPluginManager.h"
#include "Misc/Paths.h"
#include "Modules/ModuleManager.h"

/**
 * Loads the native client before anything calls it. On Windows the DLL is delay-loaded
 * (NpcdClient.Build.cs), and the loader looks for it only beside the executable and on PATH,
 * neither of which holds the plugin's copy in the editor: load it by its full path here, as
 * Unreal's third-party plugin template does, so the first npcd_* call finds it. Elsewhere the
 * library is linked normally and found through the binary's rpath.
 */
class FNpcdClientModule : public IModuleInterface
{
public:
    virtual void StartupModule() override
    {
#if PLATFORM_WINDOWS
        const TSharedPtr<IPlugin> Plugin = IPluginManager::Get().FindPlugin(TEXT("NpcdClient"));
        const FString PluginDir = Plugin.IsValid() ? Plugin->GetBaseDir() : FString();
        // Packaged games: beside the executable (RuntimeDependencies puts it there); the editor: the plugin's copy.
        const FString Candidates[] = {
            FPaths::Combine(FPlatformProcess::BaseDir(), TEXT("npcd_client.dll")),
            FPaths::Combine(PluginDir, TEXT("Binaries"), TEXT("Win64"), TEXT("npcd_client.dll")),
            FPaths::Combine(PluginDir, TEXT("ThirdParty"), TEXT("npcd_client"), TEXT("lib"), TEXT("Win64"), TEXT("npcd_client.dll")),
        };
        for (const FString& Candidate : Candidates)
        {
            if (FPaths::FileExists(Candidate) && (Handle = FPlatformProcess::GetDllHandle(*Candidate)) != nullptr) break;
        }
        if (Handle == nullptr)
        {
            UE_LOG(LogTemp, Error, TEXT("npcd: npcd_client.dll not found beside the game or in the plugin (%s): "
                                        "no NPC line can be asked"), *PluginDir);
        }
#endif
    }

    virtual void ShutdownModule() override
    {
        if (Handle != nullptr) FPlatformProcess::FreeDllHandle(Handle);
        Handle = nullptr;
    }

private:
    void* Handle = nullptr;
};

IMPLEMENT_MODULE(FNpcdClientModule, NpcdClient)
