#include "NpcdSubsystem.h"

#include "HAL/PlatformMisc.h"
#include "Misc/FileHelper.h"
#include "NpcdSettings.h"

namespace
{
// A PEM file's text, or "" when Path is empty; false when it cannot be read.
bool ReadPem(const FString& Path, FString& Out)
{
    Out.Reset();
    return Path.IsEmpty() || FFileHelper::LoadFileToString(Out, *Path);
}

// A Blueprint timeout as the C ABI's blocking calls take it (0: their default, 5000 ms).
uint32_t Wait(int32 TimeoutMs)
{
    return static_cast<uint32_t>(FMath::Max(TimeoutMs, 0));
}
}

void UNpcdSubsystem::Initialize(FSubsystemCollectionBase& Collection)
{
    Super::Initialize(Collection);
    const UNpcdSettings* Settings = GetDefault<UNpcdSettings>();
    FString Token = Settings->Token.IsEmpty() ? FPlatformMisc::GetEnvironmentVariable(TEXT("NPCD_TOKEN")) : Settings->Token;
    FString RootCerts, ClientCert, ClientKey;
    if (!ReadPem(Settings->RootCertsPemPath, RootCerts) || !ReadPem(Settings->ClientCertPemPath, ClientCert) ||
        !ReadPem(Settings->ClientKeyPemPath, ClientKey))
    {
        UE_LOG(LogTemp, Error, TEXT("npcd: cannot read a PEM file named in Project Settings > Plugins > npcd"));
        return;
    }
    // The converted strings must outlive the call (the library copies them).
    FTCHARToUTF8 Address(*Settings->Address), TokenUtf8(*Token), RootUtf8(*RootCerts), CertUtf8(*ClientCert),
        KeyUtf8(*ClientKey), NameUtf8(*Settings->TlsServerName);
    npcd_client_options Options;
    npcd_client_options_init(&Options);
    Options.address = Address.Get();
    Options.initial_backoff_ms = static_cast<uint32_t>(Settings->InitialBackoffMs);
    Options.max_backoff_ms = static_cast<uint32_t>(Settings->MaxBackoffMs);
    Options.token = Token.IsEmpty() ? nullptr : TokenUtf8.Get();
    Options.tls = Settings->bUseTls ? 1 : 0;
    Options.root_certs_pem = RootCerts.IsEmpty() ? nullptr : RootUtf8.Get();
    Options.client_cert_pem = ClientCert.IsEmpty() ? nullptr : CertUtf8.Get();
    Options.client_key_pem = ClientKey.IsEmpty() ? nullptr : KeyUtf8.Get();
    Options.tls_server_name = Settings->TlsServerName.IsEmpty() ? nullptr : NameUtf8.Get();
    npcd_status Status = NPCD_OK;
    Client = npcd_client_new_with_options(&Options, &Status);
    if (Client == nullptr)
    {
        UE_LOG(LogTemp, Error, TEXT("npcd: the connection settings were refused (status %d): %s"), static_cast<int32>(Status),
               UTF8_TO_TCHAR(npcd_last_error()));
    }
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

bool UNpcdSubsystem::ListPersonas(int32 TimeoutMs, TArray<FNpcdPersonaInfo>& Personas, int32& ErrorCode)
{
    Personas.Reset();
    npcd_persona_list* List = nullptr;
    int32_t Code = 0;
    if (!Called(npcd_list_personas(Client, Wait(TimeoutMs), &List, &Code), Code, TEXT("ListPersonas"), ErrorCode))
        return false;
    for (int32 Index = 0; Index < npcd_persona_list_count(List); ++Index)
    {
        const npcd_persona* Native = npcd_persona_list_get(List, Index);
        FNpcdPersonaInfo& Persona = Personas.AddDefaulted_GetRef();
        Persona.Id = UTF8_TO_TCHAR(Native->id);
        Persona.DisplayName = UTF8_TO_TCHAR(Native->display_name);
        Persona.Description = UTF8_TO_TCHAR(Native->description);
        Persona.MetadataJson = UTF8_TO_TCHAR(Native->metadata_json);
        Persona.bServing = Native->status == NPCD_PERSONA_READY || Native->status == NPCD_PERSONA_STALE;
        Persona.Error = UTF8_TO_TCHAR(Native->error);
        Persona.bHasAdapter = Native->has_adapter != 0;
    }
    npcd_persona_list_free(List);
    return true;
}

bool UNpcdSubsystem::Called(npcd_status Status, int32 RpcCode, const TCHAR* Call, int32& ErrorCode) const
{
    // Without a client the C ABI refused the call (a NULL client); the game sees it as the daemon unreachable.
    ErrorCode = 0;
    if (Client != nullptr && Status == NPCD_OK) return true;
    ErrorCode = Client == nullptr ? 14 : RpcCode != 0 ? RpcCode : 3;
    UE_LOG(LogTemp, Warning, TEXT("npcd: %s failed (code %d): %s"), Call, ErrorCode,
           Client == nullptr ? TEXT("no client (see the log above)") : UTF8_TO_TCHAR(npcd_last_error()));
    return false;
}

bool UNpcdSubsystem::ExportConversations(const FString& Persona, int32 TimeoutMs, TArray<uint8>& Blob, int32& ErrorCode)
{
    Blob.Reset();
    npcd_blob* Native = nullptr;
    int32_t Code = 0;
    if (!Called(npcd_export_conversations(Client, TCHAR_TO_UTF8(*Persona), Wait(TimeoutMs), &Native, &Code), Code,
                TEXT("ExportConversations"), ErrorCode))
        return false;
    Blob.Append(npcd_blob_data(Native), static_cast<int32>(npcd_blob_size(Native)));
    npcd_blob_free(Native);
    return true;
}

bool UNpcdSubsystem::ImportConversations(const TArray<uint8>& Blob, bool bReplace, int32 TimeoutMs, int32& Imported,
                                         int32& ErrorCode)
{
    uint32_t Count = 0;
    int32_t Code = 0;
    const bool bOk = Called(npcd_import_conversations(Client, Blob.GetData(), static_cast<uint64_t>(Blob.Num()),
                                                      bReplace ? 1 : 0, Wait(TimeoutMs), &Count, &Code),
                            Code, TEXT("ImportConversations"), ErrorCode);
    Imported = static_cast<int32>(Count);
    return bOk;
}

bool UNpcdSubsystem::GetConversation(const FString& Conversation, const FString& Persona, int32 TimeoutMs,
                                     TArray<FNpcdTurn>& Turns, int32& ErrorCode)
{
    Turns.Reset();
    npcd_conversation* Native = nullptr;
    int32_t Code = 0;
    if (!Called(npcd_get_conversation(Client, TCHAR_TO_UTF8(*Conversation), TCHAR_TO_UTF8(*Persona), Wait(TimeoutMs),
                                      &Native, &Code),
                Code, TEXT("GetConversation"), ErrorCode))
        return false;
    for (int32 Index = 0; Index < npcd_conversation_turn_count(Native); ++Index)
    {
        const npcd_turn* Turn = npcd_conversation_turn(Native, Index);
        FNpcdTurn& Kept = Turns.AddDefaulted_GetRef();
        Kept.Speaker = UTF8_TO_TCHAR(Turn->speaker);
        Kept.Text = UTF8_TO_TCHAR(Turn->text);
        Kept.bNpc = Turn->npc != 0;
    }
    npcd_conversation_free(Native);
    return true;
}

bool UNpcdSubsystem::AddTurn(const FString& Conversation, const FString& Persona, const FNpcdTurn& Turn, int32 TimeoutMs,
                             int32& ErrorCode)
{
    int32_t Code = 0;
    return Called(npcd_add_turn(Client, TCHAR_TO_UTF8(*Conversation), TCHAR_TO_UTF8(*Persona), TCHAR_TO_UTF8(*Turn.Speaker),
                                TCHAR_TO_UTF8(*Turn.Text), Turn.bNpc ? 1 : 0, Wait(TimeoutMs), &Code),
                  Code, TEXT("AddTurn"), ErrorCode);
}

bool UNpcdSubsystem::SetConversation(const FString& Conversation, const FString& Persona, const TArray<FNpcdTurn>& Turns,
                                     const FString& Summary, int32 TimeoutMs, int32& ErrorCode)
{
    // UTF-8 copies that live through the call (TCHAR_TO_UTF8's buffer ends with its full expression)
    TArray<TArray<ANSICHAR>> Strings;
    Strings.Reserve(Turns.Num() * 2);
    auto Utf8 = [&Strings](const FString& Text) -> const char*
    {
        FTCHARToUTF8 Converted(*Text);
        return Strings.Emplace_GetRef((const ANSICHAR*)Converted.Get(), Converted.Length() + 1).GetData();
    };
    TArray<npcd_turn> Native;
    Native.Reserve(Turns.Num());
    for (const FNpcdTurn& Turn : Turns)
        Native.Add({Utf8(Turn.Speaker), Utf8(Turn.Text), Turn.bNpc ? 1 : 0});
    int32_t Code = 0;
    return Called(npcd_set_conversation(Client, TCHAR_TO_UTF8(*Conversation), TCHAR_TO_UTF8(*Persona), Native.GetData(),
                                        Native.Num(), TCHAR_TO_UTF8(*Summary), Wait(TimeoutMs), &Code),
                  Code, TEXT("SetConversation"), ErrorCode);
}

bool UNpcdSubsystem::ResetConversation(const FString& Conversation, const FString& Persona, int32 TimeoutMs, int32& ErrorCode)
{
    int32_t Code = 0;
    return Called(npcd_reset_conversation(Client, TCHAR_TO_UTF8(*Conversation), TCHAR_TO_UTF8(*Persona), Wait(TimeoutMs),
                                          &Code),
                  Code, TEXT("ResetConversation"), ErrorCode);
}

void UNpcdSubsystem::Forget(const FString& RequestId)
{
    Listeners.Remove(RequestId);
}

void UNpcdSubsystem::Tick(float DeltaTime)
{
    if (Client == nullptr) return;
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
            else if (Event.kind == NPCD_EVENT_SENTENCE)
            {
                OnSentence.Broadcast(Id, static_cast<int32>(Event.sentence_index), UTF8_TO_TCHAR(Event.text));
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
