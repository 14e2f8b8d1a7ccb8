#include "NpcdSubsystem.h"

#include "NpcdSettings.h"

void UNpcdSubsystem::Initialize(FSubsystemCollectionBase& Collection)
{
    Super::Initialize(Collection);
    const UNpcdSettings* Settings = GetDefault<UNpcdSettings>();
    Client = npcd_client_new(TCHAR_TO_UTF8(*Settings->Address), Settings->InitialBackoffMs, Settings->MaxBackoffMs);
}

void UNpcdSubsystem::Deinitialize()
{
    npcd_client_free(Client);
    Client = nullptr;
    Listeners.Empty();
    Super::Deinitialize();
}

FString UNpcdSubsystem::Submit(npcd_request* Request, INpcdLineListener* Listener)
{
    if (Client == nullptr || npcd_submit(Client, Request) != NPCD_OK) return FString();
    FString Id = UTF8_TO_TCHAR(npcd_request_id(Request));
    Listeners.Add(Id, Listener);
    return Id;
}

void UNpcdSubsystem::Cancel(const FString& RequestId)
{
    if (Client != nullptr) npcd_cancel(Client, TCHAR_TO_UTF8(*RequestId));
}

void UNpcdSubsystem::Forget(const FString& RequestId)
{
    Listeners.Remove(RequestId);
}

void UNpcdSubsystem::Tick(float DeltaTime)
{
    npcd_event Events[64];
    int32 Count;
    do
    {
        Count = npcd_poll(Client, Events, UE_ARRAY_COUNT(Events));
        for (int32 i = 0; i < Count; ++i)
        {
            const npcd_event& Event = Events[i];
            const FString Id = UTF8_TO_TCHAR(Event.request_id);
            if (Event.kind == NPCD_EVENT_ACTION)
            {
                OnAction.Broadcast(Id, UTF8_TO_TCHAR(Event.action_name), UTF8_TO_TCHAR(Event.action_args_json));
            }
            else if (Event.kind == NPCD_EVENT_EMOTION)
            {
                OnEmotion.Broadcast(Id, UTF8_TO_TCHAR(Event.emotion));
            }
            INpcdLineListener* Listener = Listeners.FindRef(Id);
            if (Event.kind == NPCD_EVENT_FINISHED || Event.kind == NPCD_EVENT_ERROR) Listeners.Remove(Id);
            if (Listener != nullptr) Listener->OnNpcdEvent(Event);
        }
    } while (Count == UE_ARRAY_COUNT(Events));
}

TStatId UNpcdSubsystem::GetStatId() const
{
    RETURN_QUICK_DECLARE_CYCLE_STAT(UNpcdSubsystem, STATGROUP_Tickables);
}
